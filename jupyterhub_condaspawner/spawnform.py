"""The spawn form: one card per profile the user may use (its GPUs, limits, and whether its
image is built), the user's own environment.yml, and the last choice shown again; mixed
into CondaSpawner by :class:`SpawnFormMixin`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jinja2

from .buildmodel import request_for_profile
from .gpuchoice import CudaIncompatible, GpuOverQuota, GpuUnavailable
from .profiles import Profile
from .resolve import NO_DEFAULTS
from .spawnchoice import NO_PROFILE

if TYPE_CHECKING:
    from .hubservices import HubServices

TEMPLATES = Path(__file__).parent / "templates"
jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)


class SpawnFormMixin:
    """render_options_form and its cards; the host class is a CondaSpawner."""

    if TYPE_CHECKING:  # provided by CondaSpawner, the class this is mixed into
        user: Any
        name: str
        config: Any
        orm_spawner: Any
        _last_form: dict[str, Any] | None

        @property
        def services(self) -> HubServices: ...

        @property
        def _group_names(self) -> list[str]: ...

        @property
        def _normalize_username(self) -> Callable[[str], str] | None: ...

    async def render_options_form(self) -> str:
        """The spawn form: one card per profile this user may use."""
        services = self.services
        builder = services.builder
        # A submission the hub sent back with an error, else the last accepted choice.
        last = self._last_form or (self.orm_spawner.user_options if self.orm_spawner else None) or {}
        self._last_form = None
        visible = services.catalog.visible_to(self.user.name, self._group_names, self._normalize_username)
        default = services.catalog.default_for(self.user.name, self._group_names, self._normalize_username)
        selected = last.get("profile") if any(p.slug == last.get("profile") for p in visible) else (
            default.slug if default else None)
        gpu_count = await self.form_gpu_count()
        estimate = builder.build_estimate()
        cards = [await self._card(profile, selected, gpu_count, estimate) for profile in visible]
        return jinja.get_template("options_form.html").render(
            notice=services.notices.take(self.user.name, self.name),
            cards=cards,
            no_profile=NO_PROFILE[0].upper() + NO_PROFILE[1:],
            custom_text=last.get("environment", ""),
            problems=last.get("problems"),  # of the file just refused (FormRefusal)
            allowed_channels=", ".join(c for c in services.policy.allowed_channels if c != NO_DEFAULTS),
            can_check=self._hub_serves_the_check(),
        )

    def _hub_serves_the_check(self) -> bool:
        """Whether the hub has the environments page's handlers (envpage.configure), whose
        check API the form's "Check" button asks."""
        handlers = self.config.JupyterHub.get("extra_handlers", []) if "JupyterHub" in self.config else []
        return any(str(target).endswith(".CheckAPI") for _, target, *_ in handlers)

    async def form_gpu_count(self) -> int:
        """The most GPUs one server could get here (the form notes profiles that want more)."""
        return await asyncio.to_thread(lambda: len(self.services.allocator.latest_scan().usable))

    def form_gpu_note(self, profile: Profile, gpu_count: int) -> str:
        """The card's note when ``profile`` could never start here, else "": more GPUs than
        :meth:`form_gpu_count`, more than the per-user quota, none of its model, or a driver too
        old for its CUDA (the start would be refused in one line: the card says so first)."""
        if not profile.gpus:
            return ""
        if profile.gpus > gpu_count:
            return "this machine has no GPU" if gpu_count == 0 else f"this machine has {gpu_count} GPU(s)"
        allocator = self.services.allocator
        try:  # the start's own check, judged by the scan form_gpu_count just read
            allocator.check_feasible(self.user.name, self.name, profile.gpus, profile.gpu_model,
                                     cuda=profile.cuda, profile=profile.slug)
        except GpuOverQuota:
            return f"more than the {allocator.per_user_gpu_quota}-GPU quota per user"
        except CudaIncompatible:
            return f"the GPU driver here is too old for CUDA {profile.cuda}"
        except GpuUnavailable:
            return (f"no GPU here is a {profile.gpu_model.strip('*')}" if profile.gpu_model
                    else f"this machine cannot give {profile.gpus} GPU(s)")
        return ""

    async def _card(self, profile: Profile, selected: str | None, gpu_count: int, estimate: str) -> dict:
        ready = False
        if profile.environment is not None:
            with contextlib.suppress(Exception):  # no daemon or base image: show "will build"
                ready = await asyncio.to_thread(self.services.builder.is_cached, request_for_profile(profile))
        gpus = "CPU only" if not profile.gpus else f"{profile.gpus} GPU" + ("s" if profile.gpus > 1 else "")
        if profile.gpus and profile.gpu_model:
            gpus += f" ({profile.gpu_model.strip('*')})"
        return {
            "slug": profile.slug,
            "display_name": profile.display_name,
            "description": profile.description,
            "selected": profile.slug == selected,
            "allow_custom": profile.allow_custom_environment,
            "has_environment": profile.environment is not None,
            "ready": ready,
            "build_estimate": estimate,
            "gpus": gpus,
            "gpu_note": self.form_gpu_note(profile, gpu_count),
            "cpu": f"{profile.cpu_limit:g} CPU" if profile.cpu_limit else "",
            "memory": f"{profile.mem_limit / 2**30:g} GiB" if profile.mem_limit else "",
        }
