# Stand-in for redis:7.2-alpine where no registry can be reached: Debian 12's redis-server (7.0)
# with redis-cli, serving from /data. Like the official image's entrypoint, it turns protected mode
# off when it runs redis-server (the official image relies on the container network instead).
ARG BASE
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then set -- "$@" --protected-mode no; fi\nexec "$@"\n' \
        > /usr/local/bin/docker-entrypoint.sh \
    && chmod +x /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
LABEL org.toothseg.standin="redis:7.2-alpine"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
