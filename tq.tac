# twistd -ny tq.tac  -- runs one node; the config file path comes from $APPSCALE_TQ_CONFIG
from twisted.application import service

from appscale_tq.tap import makeService, options_from_env

application = service.Application("appscale-tq")
makeService(options_from_env()).setServiceParent(application)
