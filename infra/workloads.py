"""Kubernetes identities the stacks grant AWS permissions to (Pod Identity) and the installer creates."""

from __future__ import annotations

from runtime import contract

RUNTIME_NAMESPACE = "moe-fleet"
RUNTIME_SERVICE_ACCOUNT = contract.APP_NAME
EBS_CSI_SERVICE_ACCOUNT = ("kube-system", "ebs-csi-controller-sa")
FSX_CSI_SERVICE_ACCOUNT = ("kube-system", "fsx-csi-controller-sa")
