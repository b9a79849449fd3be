"""The OpenSearch plugin's own JUnit tests (rerank/opensearch_plugin/src/test), run by Maven in a temporary build
folder: the node's cached plugin build skips them (``-DskipTests``), so this is where CI runs them."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from workers.devnode import PLUGIN_PROJECT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_the_plugins_junit_tests_pass(tmp_path: Path):
    mvn = shutil.which("mvn")
    assert mvn is not None, "Maven is installed by tests/services.sh"
    build = tmp_path / "target"
    proc = subprocess.run([mvn, "-B", "-q", "-f", str(PLUGIN_PROJECT / "pom.xml"), f"-Dfusionrank.build={build}", "package"],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    reports = sorted((build / "surefire-reports").glob("TEST-*.xml"))
    classes = {r.name.removeprefix("TEST-org.fusionrank.opensearch.").removesuffix(".xml") for r in reports}
    assert {"FusionrankRerankProcessorTests", "QueryTextAndExtTests"} <= classes
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in reports:
        root = ET.parse(r).getroot()
        for k in totals:
            totals[k] += int(root.get(k, "0"))
    assert totals["tests"] >= 15 and totals["failures"] == totals["errors"] == totals["skipped"] == 0, totals
    assert len(list(build.glob("fusionrank-opensearch-*.zip"))) == 1
