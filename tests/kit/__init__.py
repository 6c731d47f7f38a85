"""The test kit: what tests share, so that no test module imports another.

- ``wait``: the one poller (``until``) and the one time slack (``SLACK_S``,
  scaled by ``WSPROXY_TEST_SLACK`` on a loaded machine);
- ``ws``: RFC 6455 by hand (upgrade requests, ``accept_for``, a frame codec)
  for tests that play a raw peer;
- ``servers``: in-process proxies (``start_proxy``) and backends over loopback;
- ``process``: ``wsproxy run`` as a real process (``run_wsproxy``);
- ``admin``: a client of the admin API;
- ``authservice``: a forward-auth service;
- ``backends``: recording raw backends for handshake tests;
- ``tls``: a throwaway PKI (trustme) and a real ClientHello;
- ``h11_requests``: upgrade requests as the listener reads them, for pure tests.

Real peers everywhere (trio-websocket, websockets, sockets, processes); no
mocks. ``tests/test_kit.py`` keeps test modules from importing each other (and
tests the kit's own guarantees).
"""
