"""The test kit: what tests share, so that no test module imports another.

- ``wait``: the one poller (``until``) and the one time slack (``SLACK_S``,
  scaled by ``WSPROXY_TEST_SLACK`` on a loaded machine);
- ``ws``: RFC 6455 by hand (upgrade requests, ``accept_for``, a frame codec)
  for tests that play a raw peer;
- ``servers``: in-process proxies (``start_proxy``, ``start_proxy_from`` a
  YAML ``simple_config``) and backends over loopback;
- ``process``: ``wsproxy run`` as a real process (``run_wsproxy``), and the
  operator's commands against it (``wsproxy_cmd``, ``running``);
- ``admin``: a client of the admin API, and ``/metrics`` read as a scraper would;
- ``sessions``: an in-process proxy with token identities and its admin API,
  and clients that hold sessions (``start_stack``, ``open_client``);
- ``authservice``: a forward-auth service;
- ``relayed``: one established session's relay (the epoll engine's or the
  trio pumps') between two socket pairs, with both far ends played raw
  (``relayed``, ``answer``), for tests on trio's virtual clock;
- ``backends``: recording raw backends for handshake tests;
- ``tls``: a throwaway PKI (trustme, the ``pki`` fixture), TLS clients and a
  real ClientHello;
- ``browser``: Debian's Chromium driven by Playwright (``with_browser``);
- ``logfmt``: an independent parser for the text log lines;
- ``h11_requests``: upgrade requests as the listener reads them, for pure tests.

Real peers everywhere (trio-websocket, websockets, sockets, processes); no
mocks. ``tests/test_kit.py`` keeps test modules from importing each other (and
tests the kit's own guarantees).
"""
