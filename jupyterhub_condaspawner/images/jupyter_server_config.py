# Copied verbatim into every environment image at /opt/conda/etc/jupyter/ (beside the
# image's own jupyter_server_config.json) and run by the single-user server's Python 3.9.
#
# The environment's kernel is named in JupyterLab from the server's environment, which the
# hub sets from the profile's display name (CONDASPAWNER_KERNEL_DISPLAY_NAME): the image holds
# no display name, so renaming a profile reuses its image. Without the variable (the image
# run by hand) the kernel keeps the name in its kernel.json, the environment's folder name.
import os

from jupyter_client.kernelspec import KernelSpecManager

DISPLAY_NAME_VARIABLE = "CONDASPAWNER_KERNEL_DISPLAY_NAME"


class EnvironmentKernelSpecManager(KernelSpecManager):
    """Kernel specs as on disk, but the environment's kernel named by the hub."""

    def get_kernel_spec(self, kernel_name):
        spec = super().get_kernel_spec(kernel_name)
        display_name = os.environ.get(DISPLAY_NAME_VARIABLE, "").strip()
        if display_name and "condaspawner" in (spec.metadata or {}):
            spec.display_name = display_name
        return spec


c = get_config()  # type: ignore[name-defined]  # noqa: F821  (traitlets runs config files with it)
c.ServerApp.kernel_spec_manager_class = EnvironmentKernelSpecManager
