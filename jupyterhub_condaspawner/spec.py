"""EnvironmentSpec: parse, validate and normalise a user's conda ``environment.yml``.

Everything a user uploads passes through :func:`SpecPolicy.parse`. It either returns
an :class:`EnvironmentSpec` in canonical form or raises :class:`SpecError` whose
message is one line naming the field (and YAML line) that was refused.

This module holds the admin's settings (:class:`SpecPolicy`) and the entry points;
the work is split by concept: ``specyaml`` (bytes to a strict YAML node tree),
``specreader`` (the node tree to an EnvironmentSpec, collecting every problem),
``specentries`` (one conda spec, pip line or channel), ``specpip`` (pip line rules)
and ``specmodel`` (SpecError, EnvironmentSpec). Their public names are re-exported here.
"""

from __future__ import annotations

import yaml
from traitlets import Integer, List, Unicode
from traitlets.config import Configurable

from .specmodel import EnvironmentSpec, SpecError, SpecLimits, show
from .specpip import pip_requirement_text
from .specreader import TOP_LEVEL_KEYS, SpecReader
from .specyaml import decode, load_yaml
from .traittypes import FiniteFloat

__all__ = ["DEFAULT_CHANNELS", "TOP_LEVEL_KEYS", "EnvironmentSpec", "SpecError", "SpecPolicy", "parse_environment",
           "pip_requirement_text", "show"]

DEFAULT_CHANNELS = ["conda-forge", "pytorch", "nvidia", "bioconda", "defaults", "nodefaults"]


class SpecPolicy(Configurable):
    """Limits and policy applied to every environment.yml (users' and profiles')."""

    max_file_bytes = Integer(
        256 * 1024,
        min=1,
        config=True,
        help="""Largest environment.yml accepted, in bytes.

        c.SpecPolicy.max_file_bytes = 512 * 1024
        """,
    )
    max_dependencies = Integer(
        1000,
        min=1,
        config=True,
        help="""Most dependencies (conda and pip together) one environment may list.

        c.SpecPolicy.max_dependencies = 2000
        """,
    )
    max_spec_length = Integer(
        200,
        min=1,
        config=True,
        help="""Longest single dependency line, in characters.

        c.SpecPolicy.max_spec_length = 300
        """,
    )
    max_name_length = Integer(
        100,
        min=1,
        config=True,
        help="""Longest package name, environment name or variable name, in characters.

        c.SpecPolicy.max_name_length = 128
        """,
    )
    max_yaml_depth = Integer(
        10,
        min=1,
        config=True,
        help="""Deepest YAML nesting accepted (an environment.yml needs 5).

        c.SpecPolicy.max_yaml_depth = 10
        """,
    )
    max_problems = Integer(
        20,
        min=1,
        config=True,
        help="""Most problems one refused file reports (the rest are counted).

        c.SpecPolicy.max_problems = 50
        """,
    )
    precheck_timeout = FiniteFloat(
        20,
        min=0,
        config=True,
        help="""Seconds the spawner may spend solving a user's own environment before it accepts
        the spawn (and `condaspawner validate --solve` per file). One that cannot be solved is
        refused at once, with the solver's reason; past this time the spawn goes on and the
        build reports. 0 turns the pre-check off.

        c.SpecPolicy.precheck_timeout = 30
        """,
    )
    allowed_channels = List(
        Unicode(),
        default_value=list(DEFAULT_CHANNELS),
        config=True,
        help="""Conda channel names users may list, in `channels:` or as `channel::package`.

        Only names: URLs and file paths are always refused. Names resolve under the
        resolver's channel alias (conda-forge, or a mirror).

        c.SpecPolicy.allowed_channels = ["conda-forge", "nodefaults", "my-lab"]
        """,
    )

    def parse(self, data: str | bytes, source: str | None = None) -> EnvironmentSpec:
        """Validate and normalise an environment file; raise SpecError on any problem."""
        try:
            document = load_yaml(decode(data, self.max_file_bytes), self.max_yaml_depth, self.max_yaml_values,
                                 f"an environment lists at most {self.max_dependencies} dependencies "
                                 "(the hub admin sets c.SpecPolicy.max_dependencies)")
            return SpecReader(self._limits()).read(document)
        except SpecError as error:
            error.source = source
            raise

    def parse_mapping(self, mapping: dict, source: str | None = None) -> EnvironmentSpec:
        """Validate an environment given as an already-loaded mapping (inline in a profile)."""
        try:
            text = yaml.safe_dump(mapping, width=float("inf"))  # no line broken: the check reads entries whole
        except yaml.YAMLError as error:
            raise SpecError(f"not a plain YAML mapping ({error.__class__.__name__})", source=source)
        return self.parse(text, source)

    @property
    def max_yaml_values(self) -> int:
        """Most YAML values (scalars, lists, mappings) a file may hold: room for
        max_dependencies entries and as many variables, names and keys besides."""
        return 4 * self.max_dependencies + 100

    def _limits(self) -> SpecLimits:
        return SpecLimits(
            max_dependencies=self.max_dependencies,
            max_spec_length=self.max_spec_length,
            max_name_length=self.max_name_length,
            max_problems=self.max_problems,
            allowed_channels=tuple(self.allowed_channels),
        )


def parse_environment(data: str | bytes, source: str | None = None, policy: SpecPolicy | None = None) -> EnvironmentSpec:
    """Parse an environment.yml with ``policy`` (default limits when None)."""
    return (policy or SpecPolicy()).parse(data, source)
