"""Guestbook: an unmodified App Engine (Python 3, ``appengine-python-standard``) app whose task
queue calls run against an appscale-tq node. See README.md."""
