# Stand-in for python:3.11-slim where no registry can be reached: Debian 12's python3 (3.11) in a
# venv on PATH, so `python`, `pip` and the console scripts that pip installs are where the official
# image has them. Built by tests/docker_engine.py only after `docker pull` fails.
ARG BASE
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
LABEL org.toothseg.standin="python:3.11-slim"
CMD ["python3"]
