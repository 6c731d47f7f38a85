# wsproxy as a container: the wheel (README.md, "Install") in a venv at /opt/wsproxy,
# run by an unprivileged user, the config at /etc/wsproxy/wsproxy.yaml.
#
#   docker build -t wsproxy .
#   docker run --rm -p 8080:8080 --stop-timeout 40 -e WSPROXY_BACKEND=10.0.0.5:9000 wsproxy
#
# Linted by tests/e2e/test_deploy.py (user, health check, stop signal, every COPY source).

# --- build: the wheel, with the mypy-compiled frame scanner (gcc and headers are in the full image)
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY wsproxy ./wsproxy
RUN python -m pip install --no-cache-dir --quiet build \
 && python -m build --wheel --outdir /dist .

# --- run: python:3.11-slim, the runtime dependencies only
FROM python:3.11-slim
COPY --from=build /dist/ /tmp/dist/
RUN python -m venv /opt/wsproxy \
 && /opt/wsproxy/bin/pip install --no-cache-dir --quiet --disable-pip-version-check /tmp/dist/wsproxy-*.whl \
 && rm -rf /tmp/dist \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wsproxy
COPY deploy/docker/wsproxy.yaml /etc/wsproxy/wsproxy.yaml
ENV PATH=/opt/wsproxy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
# 8080: the listener "public"; 9090: the admin API (loopback in the default config)
EXPOSE 8080 9090
# SIGTERM: close sessions with 1001 within shutdown.timeout + spread, then exit 0
STOPSIGNAL SIGTERM
# slim has no curl: the venv's Python asks the admin listener (no token needed for /healthz)
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/opt/wsproxy/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
ENTRYPOINT ["/opt/wsproxy/bin/wsproxy"]
CMD ["run", "-c", "/etc/wsproxy/wsproxy.yaml"]
