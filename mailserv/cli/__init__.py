"""The ``mailserv`` console script."""
