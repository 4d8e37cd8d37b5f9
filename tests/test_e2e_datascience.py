"""The demo's data-science profile as a newcomer meets it: a real hub on the demo's channel
(the dev channel plus numpy, pandas and matplotlib from PyPI), a first start that builds
the image, and a kernel that computes and plots with them."""

from __future__ import annotations

import pytest
from test_e2e import messages, spawn_and_wait

pytestmark = pytest.mark.docker
HUB_REAL_SET = "datascience"  # the hub fixture serves the channel `make demo` serves

PLOT = (
    "import numpy, pandas, matplotlib, io; import matplotlib.pyplot as plt\n"
    "frame = pandas.DataFrame({'x': numpy.linspace(0, 1, 11)}).assign(y=lambda f: f.x ** 2)\n"
    "figure, axes = plt.subplots(); frame.plot(x='x', y='y', ax=axes)\n"
    "png = io.BytesIO(); figure.savefig(png, format='png')\n"
    "print(numpy.__version__, pandas.__version__, matplotlib.__version__, round(frame.y.sum(), 2),"
    " png.getvalue()[:4] == b'\\x89PNG')\n"
)


async def test_newcomer_starts_the_data_science_profile(hub):
    events, seconds = spawn_and_wait(hub, "newcomer", {"profile": "datascience"})
    assert events[-1].get("ready"), events[-1]
    assert any(m.startswith("First build of this environment") for m in messages(events))
    status, specs = hub.user_api("newcomer", "/kernelspecs")
    assert status == 200 and specs["default"] == "datascience"
    output = await hub.execute("newcomer", "datascience", PLOT)
    assert output.split() == ["2.0.2", "2.3.3", "3.9.4", "3.85", "True"], output
    print(f"\ndata-science profile: first start (build) {seconds:.1f} s")
    hub.stop_server("newcomer")
