"""POP3 (RFC 1939) with CAPA, STLS, SASL and APOP; ``build_factory`` builds a listener."""
