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

# pip runs here, in the container, with the env's own pip: never on the hub host. It runs
# the build code of any sdist the user names, so without a single capability (setpriv,
# util-linux): no raw sockets (capturing traffic on the build's network), no ignoring file
# modes; root still owns the env, so pip can write it.
RUN set -e; \
    if [ -s /opt/condaspawner/requirements.txt ]; then \
        command -v setpriv > /dev/null \
            || { echo "the base image has no setpriv (util-linux): pip sections need it" >&2; exit 1; }; \
        PIP_CONFIG_FILE=/opt/condaspawner/pip.conf \
        setpriv --bounding-set=-all --inh-caps=-all --no-new-privs \
            /opt/conda/envs/${ENV_NAME}/bin/python -m pip install \
            --no-cache-dir --disable-pip-version-check --no-warn-script-location \
            -r /opt/condaspawner/requirements.txt; \
    fi; \
    rm -rf /root/.cache /tmp/*

USER jovyan
