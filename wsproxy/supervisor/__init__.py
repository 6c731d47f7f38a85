"""``workers: N``: a supervisor process and N worker processes that share nothing.

::

    supervisor (supervisor.main, trio)      config, signals, systemd notify, the admin listener,
    │                                       the health checks, N SO_REUSEPORT sockets per listener
    ├── worker 0 (supervisor.worker, trio)  an ``App`` on socket 0 of each listener, no admin, no checks
    ├── worker 1                            ...
    └── ...

Each worker talks to the supervisor over one Unix socketpair: JSON lines, with
listening sockets passed as ``SCM_RIGHTS`` (``supervisor.ipc``). What is
decided (the worker table, restart backoff, the two-phase reload, how limits
are split, how the workers' status and metrics add up, how the sessions API
is asked of the workers and their answers merged) is sans-I/O: ``messages``,
``table``, ``merge``, ``fanout``. The trio layers are the supervisor
(``main``, with its parts ``state``, ``sockets``, ``slots``, ``reloading``,
``upgrade``, ``admin_view``, ``sessions_api``) and ``worker``. After an
upgrade the generation that retires stays reachable over the upgrade channel
until it exits: the new supervisor's sessions API and ``/status`` include it.

A worker builds its config from the supervisor's snapshot of the YAML files
of the config in effect (``config.snapshot``; the ``config`` message, and
``prepare`` at a reload), never from the YAML on disk: a worker restarted
while the file is being edited serves what the others serve.

``workers: 1`` does not come here at all: ``wsproxy run`` is then the one
process it always was (``wsproxy.run``).
"""
