# Offline single-user base: the same layout as images/miniconda-py39, built where no
# registry or conda channel is reachable (see jupyterhub_condaspawner/baseimage.py).
#
# Build context (staged by build_base_image):
#   conda/                        a conda prefix (Python + pip) installed for /opt/conda
#   singleuser-requirements.txt   the pins both base images install
#   install-singleuser.sh         how both base images install them
#   Dockerfile                    this file
ARG ROOTFS_IMAGE=condaspawner-rootfs:bookworm
FROM ${ROOTFS_IMAGE}

ARG PYTHON_VERSION=3.9

COPY conda /opt/conda
COPY singleuser-requirements.txt install-singleuser.sh /tmp/

# The find only touches files that need it (build_base_image already fixed the modes),
# so the conda layer is not copied a second time. pip needs the internet: build with
# host networking; the rootfs image sets PIP_CERT etc. for the intercepting proxy.
# PIP_WHEELS_URL: the wheels the bench fetched beforehand, served on loopback (basewheels.py).
ARG PIP_WHEELS_URL=
RUN if [ -n "$PIP_WHEELS_URL" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PIP_WHEELS_URL"; fi \
 && find /opt/conda ! -type l \( ! -perm -a+r -o -type d ! -perm -a+x \) -exec chmod a+rX {} + \
 && mkdir -p /opt/conda/envs \
 && /opt/conda/bin/python -c 'import os, sys; v = "%d.%d" % sys.version_info[:2]; \
v == os.environ["PYTHON_VERSION"] or sys.exit("conda/ holds Python " + v)' \
 && sh /tmp/install-singleuser.sh /tmp/singleuser-requirements.txt \
 && rm /tmp/singleuser-requirements.txt /tmp/install-singleuser.sh

ENV PATH=/opt/conda/bin:$PATH
USER jovyan
WORKDIR /home/jovyan
# tini as PID 1 reaps the kernels' orphaned children; -g forwards signals to the group.
ENTRYPOINT ["tini", "-g", "--"]
CMD ["jupyterhub-singleuser"]
LABEL io.condaspawner.base.python="${PYTHON_VERSION}"
