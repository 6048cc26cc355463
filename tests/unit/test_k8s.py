"""pdserve/k8s.py: the Kubernetes client both the discovery and the scaler build."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.errors import ConfigError
from pdserve.k8s import load_api_client

pytest.importorskip("kubernetes")

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://10.11.12.13:6443", insecure-skip-tls-verify: true}
users:
- name: test
  user: {token: abc}
contexts:
- name: test
  context: {cluster: test, user: test}
current-context: test
"""


def _outside_a_pod(monkeypatch: pytest.MonkeyPatch, kubeconfig: Path) -> None:
    # No service account: the in-cluster loader needs these variables.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    # The client reads $KUBECONFIG once, at import: point its default at the test's file.
    from kubernetes.config import kube_config  # type: ignore[import-not-found, unused-ignore]

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))


def test_falls_back_to_the_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config"
    path.write_text(KUBECONFIG)
    _outside_a_pod(monkeypatch, path)
    api = load_api_client("kubernetes discovery")
    assert api.configuration.host == "https://10.11.12.13:6443"
    assert api.configuration.api_key == {"BearerToken": "Bearer abc"}


def test_no_credentials_is_a_config_error_naming_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _outside_a_pod(monkeypatch, tmp_path / "missing")
    with pytest.raises(ConfigError) as caught:
        load_api_client("kubernetes scaler")
    assert caught.value.message.startswith("kubernetes scaler: no service account token")
