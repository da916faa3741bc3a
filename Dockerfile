# polygon-streamer as a container: Debian 12 slim, the Debian packages the .deb depends on (the same library versions
# the package runs on), a non-root user, configuration from the environment only, /health as the health check.
#
#   docker build -t polygon-streamer .
#   docker run --rm -e POLYGON_API_KEY=... -e POLYGON_CLUSTER=stocks -e SUBSCRIPTION='T.*,Q.*' \
#       -e SINK=ndjson -e NDJSON_DEST=/data/stocks.ndjson -v /srv/polygon:/data -p 127.0.0.1:9898:9898 polygon-streamer
#
# SIGTERM (docker stop) drains and flushes within SHUTDOWN_TIMEOUT_SECS: give `docker stop -t` more than that.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-websocket \
        python3-ujson python3-zmq python3-prometheus-client python3-click python3-redis python3-wsproto \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin \
        polygon-streamer \
    && mkdir -p /data && chown polygon-streamer:polygon-streamer /data && chmod 0750 /data

COPY polygon_streamer /usr/lib/python3/dist-packages/polygon_streamer
RUN printf '#!/usr/bin/python3\nimport sys\nfrom polygon_streamer.cli import main\nsys.exit(main())\n' \
        > /usr/bin/polygon-streamer \
    && chmod 0755 /usr/bin/polygon-streamer \
    && python3 -m compileall -q /usr/lib/python3/dist-packages/polygon_streamer \
    && polygon-streamer --version

# Listen where a published port reaches it; everything else is the service's defaults until the environment says.
ENV METRICS_ADDR=0.0.0.0:9898 \
    PYTHONUNBUFFERED=1
EXPOSE 9898
USER polygon-streamer
WORKDIR /data
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; host, port = os.environ.get('METRICS_ADDR', '127.0.0.1:9898').rsplit(':', 1); urllib.request.urlopen(f'http://{host.replace(\"0.0.0.0\", \"127.0.0.1\")}:{port}/health', timeout=4)"]
ENTRYPOINT ["/usr/bin/polygon-streamer"]
CMD ["run"]
