# -*- coding: utf-8 -*-
"""Autobahn's own echo servers on a loopback port, for `make conformance`.

This is Python 2 (it runs in .venv-autobahn beside wstest): it starts one of
the echo servers that ship with Autobahn|Testsuite, unchanged, and differs from
`wstest -m echoserver` / `wstest -m testeeserver` in only two ways:

- it binds 127.0.0.1 (wstest binds every address) on a port the kernel picks,
  and prints ``listening PORT`` on stdout once it accepts connections;
- the factory is given no URL, so Autobahn does not compare the Host header's
  port with its own (through the proxy, Host names the proxy's port).

Kinds:
  echo     wstest's echoserver (EchoServerFactory): no extensions, and it fails
           a connection by dropping TCP, as wstest -m echoserver does.
  deflate  wstest's testeeserver (TesteeServerFactory): an echo server that
           accepts permessage-deflate (cases 12.x and 13.x) and closes with a
           close frame when it fails a connection.

It is not a test of anything by itself and has no options beyond the kind.
"""
from __future__ import print_function

import sys

# Autobahn|Testsuite installs its reactor on import: it must come first.
from autobahntestsuite import choosereactor  # noqa: F401
from autobahntestsuite.echo import EchoServerFactory
from autobahntestsuite.testee import TesteeServerFactory
from twisted.internet import reactor

FACTORIES = {"echo": EchoServerFactory, "deflate": TesteeServerFactory}


def main(argv):
    if len(argv) != 2 or argv[1] not in FACTORIES:
        print("usage: backend.py echo|deflate", file=sys.stderr)
        return 2
    factory = FACTORIES[argv[1]](None)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print("listening %d" % port.getHost().port)
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
