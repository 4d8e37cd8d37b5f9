"""The test and demo bench of jupyterhub-condaspawner; not part of the product.

It sets up, on a bare machine with no registry and no conda channel, what an admin's
site provides in production: a private Docker daemon, a local conda channel, an offline
base image and configurable-http-proxy. The product (``jupyterhub_condaspawner``) never
imports this package and the wheel does not ship it. See README.md here.
"""
