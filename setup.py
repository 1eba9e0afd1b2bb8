"""Installation of mailserv: the package, the twistd plugin and the console script."""

from setuptools import find_packages, setup

setup(
    name="mailserv",
    version="0.1.0",
    description="A complete mail server (SMTP MX, submission, IMAP4, POP3) on Twisted",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["mailserv", "mailserv.*"]) + ["twisted.plugins"],
    package_data={"mailserv": ["py.typed", "default.toml"]},
    include_package_data=True,
    install_requires=[
        "Twisted>=24.3",
        "zope.interface>=6.0",
        "pyOpenSSL>=24.0",
        "service-identity>=24.1",
        "cryptography>=42",
        "dnspython>=2.6,<3",  # mailserv/dns.py drives dnspython's _Resolution, as its async resolvers do
        "pycares>=5,<6",  # c-ares for the filters' plain lookups (dns.py relies on pycares 5's cffi lib)
        "dkimpy>=1.1,<2",  # mailserv/filters/dkim.py replaces two of its internals (checked equal in tests)
        "pynacl>=1.5",  # Ed25519 DKIM/ARC keys in dkimpy (RFC 8463)
        "pyspf>=2.0.14",  # RFC 7208 SPF evaluation with its processing limits (filters/spf.py)
        "publicsuffixlist>=1.0",  # DMARC organizational domain from a bundled PSL snapshot
        "regex>=2024.0",  # header/body rules with a match timeout (filters/rules.py)
        "ldap3>=2.9",
        # The exposition format and the process collector (CPU, RSS, fds) are the Prometheus
        # project's own; ours would drift from the format the scrapers parse.
        "prometheus-client>=0.20",
        "idna>=3.6",
        # Password hashing: argon2 and bcrypt are the reference C implementations;
        # writing either ourselves would be a security liability.
        "argon2-cffi>=23.1",
        "bcrypt>=4.1",
        # SHA-crypt/MD5-crypt verification (the stdlib crypt module is gone in 3.13).
        "passlib>=1.7.4",
        # SQL and PAM checkers.
        "psycopg[binary]>=3.1",
        "PyMySQL>=1.1",
        "python-pam>=2.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "build>=1.2",
            "ruff==0.17.6",  # pinned: formatting must not drift between machines
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
            "authres>=1.2",  # dkimpy's arc_sign needs it: the ARC tests seal their own chains
            "imapclient>=3.0",  # the IMAP integration tests drive the server as a real client does
        ],
    },
    entry_points={"console_scripts": ["mailserv = mailserv.cli.main:main"]},
    zip_safe=False,
)
