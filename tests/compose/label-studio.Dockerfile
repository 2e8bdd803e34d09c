# Stand-in for heartexlabs/label-studio where no registry can be reached: the same Label Studio
# release from PyPI on the python stand-in, run as the official image runs it (uid 1001, data in
# /label-studio/data, port 8080 on all interfaces).
ARG BASE
FROM ${BASE}
ARG LABEL_STUDIO_VERSION
# scripts/setup's pins for Label Studio from the index (sentry-sdk<3: 1.23.2 does not start with 3.0)
ARG LABEL_STUDIO_PINS
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN pip install --no-cache-dir --quiet "label-studio==${LABEL_STUDIO_VERSION}" ${LABEL_STUDIO_PINS} \
    && useradd --create-home --uid 1001 labelstudio \
    && mkdir -p /label-studio/data && chown -R 1001 /label-studio
ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data
WORKDIR /label-studio
USER 1001
EXPOSE 8080
LABEL org.toothseg.standin="heartexlabs/label-studio"
CMD ["label-studio", "start", "--no-browser", "--port", "8080", "--internal-host", "0.0.0.0"]
