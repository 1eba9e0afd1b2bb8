# twistd -ny tac/mailserv.tac
# The configuration file comes from $MAILSERV_CONFIG, else /etc/mailserv/mailserv.toml;
# when neither exists, the embedded default (domain localhost, state in $MAILSERV_HOME or ./var).
import os

from twisted.application.service import Application
from twisted.internet import reactor

from mailserv.config import default_config, load_config
from mailserv.service import MailService

path = os.environ.get("MAILSERV_CONFIG", "/etc/mailserv/mailserv.toml")
config = load_config(path) if os.path.exists(path) else default_config()
application = Application("mailserv")
MailService.from_config(config, reactor, handle_signals=True).setServiceParent(application)
