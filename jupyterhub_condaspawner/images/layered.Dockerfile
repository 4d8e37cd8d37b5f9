# What an environment loaded as layers (ImageBuilder.layered_images) still needs from
# Docker: its pip section, and byte-compiling where the builder could not (a Docker daemon
# on another host). This file is static: the requirements and pip.conf are in the loaded
# image already (/opt/condaspawner), and the build context holds only this file.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG ENV_NAME
# 1: the loaded layers hold no byte code
ARG COMPILE=0
USER root

# Packages converted from wheels carry no .pyc and jovyan cannot write __pycache__.
RUN if [ "$COMPILE" = 1 ]; then \
        /opt/conda/envs/${ENV_NAME}/bin/python -m compileall -q -j 0 /opt/conda/envs/${ENV_NAME}/lib > /dev/null \
        || true; \
    fi

# pip runs here, in the container, with the env's own pip: never on the hub host.
RUN set -e; \
    if [ -s /opt/condaspawner/requirements.txt ]; then \
        PIP_CONFIG_FILE=/opt/condaspawner/pip.conf /opt/conda/envs/${ENV_NAME}/bin/python -m pip install \
            --no-cache-dir --disable-pip-version-check --no-warn-script-location \
            -r /opt/condaspawner/requirements.txt; \
    fi; \
    rm -rf /root/.cache /tmp/*

USER jovyan
