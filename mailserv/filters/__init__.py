"""Filters: analyse, adjust and authenticate messages at each SMTP stage.

``base`` defines Verdict and FilterBase, ``chain`` runs a pipeline with
per-filter timeouts (fail closed), ``registry`` builds pipelines from config.
"""
