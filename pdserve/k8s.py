"""Kubernetes API access shared by the router's pod discovery and the autoscaler's scaler.

The official client (the ``kubernetes`` extra) is imported only when a client is built.
"""

from __future__ import annotations

from typing import Any

from pdserve.errors import ConfigError


def load_api_client(user: str) -> Any:
    """A ``kubernetes.client.ApiClient`` with the pod's service account, else the local
    kubeconfig (``$KUBECONFIG`` or ~/.kube/config). ``user`` names the caller in the
    ConfigError raised when neither is there, e.g. "kubernetes discovery"."""
    from kubernetes import client  # type: ignore[import-not-found, unused-ignore]
    from kubernetes import config as kube_config  # type: ignore[import-not-found, unused-ignore]

    configuration = client.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        try:
            kube_config.load_kube_config(client_configuration=configuration, persist_config=False)
        except (kube_config.ConfigException, OSError) as e:
            raise ConfigError(f"{user}: no service account token and no kubeconfig ({e})") from e
    return client.ApiClient(configuration)
