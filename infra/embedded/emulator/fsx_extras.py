"""FSx for Lustre gaps in moto 5.2 (JSON 1.1 API, `X-Amz-Target: AWSSimbaAPIService_v20180301.<Action>`).

- File systems come back without `Lifecycle`, `MountName`, `FileSystemTypeVersion`, `VpcId`, `OwnerId`:
  Terraform waits for AVAILABLE forever and plans replacements. We fill them in (`complete_file_system`).
- DescribeFileSystems of a deleted id returns an empty list instead of FileSystemNotFound, so Terraform
  never sees a delete finish. We answer FileSystemNotFound.
- After a successful DeleteFileSystem the provider (5.100.0) waits for the file system to disappear, and
  against moto its waiter never issued a single DescribeFileSystems in 9 minutes (TF_LOG=DEBUG; the 30 s
  delay in the provider's source does not explain it). moto deletes at once, so we pass the delete on and
  then answer FileSystemNotFound, which the provider takes as "already gone" and returns at once.
- Data repository associations do not exist. We serve Create/Describe/Update/Delete in memory
  (AVAILABLE at once; DELETING then gone).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Any

from infra.embedded.emulator.errors import ApiError

ACCOUNT_ID = "123456789012"
TARGET_PREFIX = "AWSSimbaAPIService_v20180301."
DRA_ACTIONS = {
    "CreateDataRepositoryAssociation",
    "DescribeDataRepositoryAssociations",
    "UpdateDataRepositoryAssociation",
    "DeleteDataRepositoryAssociation",
}

_lock = threading.Lock()
_associations: dict[tuple[str, str], dict[str, Any]] = {}
_versions: dict[tuple[str, str], str] = {}
_vpcs: dict[tuple[str, str], str] = {}


def reset() -> None:
    with _lock:
        _associations.clear()
        _versions.clear()
        _vpcs.clear()


def remember_create(region: str, body: dict[str, Any], response: dict[str, Any]) -> None:
    fs = response.get("FileSystem") or {}
    if "FileSystemId" in fs:
        vpc_id = _subnet_vpc(region, (body.get("SubnetIds") or [None])[0])
        with _lock:
            _versions[(region, fs["FileSystemId"])] = body.get("FileSystemTypeVersion") or "2.15"
            if vpc_id:
                _vpcs[(region, fs["FileSystemId"])] = vpc_id


def _subnet_vpc(region: str, subnet_id: str | None) -> str | None:
    """The subnet's VPC, or None once the subnet is gone: moto never finishes FSx deletes, so a file system
    can outlive its subnet while another stack is destroyed, and DescribeFileSystems lists it still."""
    from moto.ec2.exceptions import InvalidSubnetIdError
    from moto.ec2.models import ec2_backends

    if not subnet_id:
        return None
    try:
        return ec2_backends[ACCOUNT_ID][region].get_subnet(subnet_id).vpc_id
    except InvalidSubnetIdError:
        return None


def complete_file_system(region: str, fs: dict[str, Any]) -> dict[str, Any]:
    fs_id = fs.get("FileSystemId", "")
    fs.setdefault("Lifecycle", "AVAILABLE")
    fs.setdefault("OwnerId", ACCOUNT_ID)
    fs.setdefault("CreationTime", time.time())
    fs.setdefault("NetworkInterfaceIds", [])
    with _lock:
        fs.setdefault("FileSystemTypeVersion", _versions.get((region, fs_id), "2.15"))
    if "VpcId" not in fs:
        with _lock:
            vpc_id = _vpcs.get((region, fs_id))
        vpc_id = vpc_id or _subnet_vpc(region, (fs.get("SubnetIds") or [None])[0])
        if vpc_id:
            fs["VpcId"] = vpc_id
    lustre = fs.get("LustreConfiguration")
    if isinstance(lustre, dict):
        lustre.setdefault("MountName", hashlib.sha256(fs_id.encode()).hexdigest()[:8])
        lustre.setdefault("DataCompressionType", "NONE")
    return fs


def missing_file_systems(requested: list[str], found: list[dict[str, Any]]) -> list[str]:
    present = {fs.get("FileSystemId") for fs in found}
    return [fs_id for fs_id in requested if fs_id not in present]


def handle(action: str, region: str, body: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    with _lock:
        if action == "CreateDataRepositoryAssociation":
            assoc_id = f"dra-{uuid.uuid4().hex[:17]}"
            assoc = {
                "AssociationId": assoc_id,
                "ResourceARN": f"arn:aws:fsx:{region}:{ACCOUNT_ID}:association/{body['FileSystemId']}/{assoc_id}",
                "FileSystemId": body["FileSystemId"],
                "Lifecycle": "AVAILABLE",
                "FileSystemPath": body["FileSystemPath"],
                "DataRepositoryPath": body["DataRepositoryPath"],
                "BatchImportMetaDataOnCreate": body.get("BatchImportMetaDataOnCreate", False),
                "ImportedFileChunkSize": body.get("ImportedFileChunkSize", 1024),
                "S3": body.get("S3") or {},
                "Tags": body.get("Tags") or [],
                "CreationTime": now,
            }
            _associations[(region, assoc_id)] = assoc
            return {"Association": assoc}
        if action == "DescribeDataRepositoryAssociations":
            ids = body.get("AssociationIds") or []
            found = [a for (r, i), a in _associations.items() if r == region and (not ids or i in ids)]
            if ids and not found:
                raise ApiError("DataRepositoryAssociationNotFound", f"Association {ids} not found")
            return {"Associations": found}
        assoc_id = body.get("AssociationId", "")
        if (region, assoc_id) not in _associations:
            raise ApiError("DataRepositoryAssociationNotFound", f"Association {assoc_id} not found")
        if action == "UpdateDataRepositoryAssociation":
            assoc = _associations[(region, assoc_id)]
            for field in ("ImportedFileChunkSize", "S3"):
                if field in body:
                    assoc[field] = body[field]
            return {"Association": assoc}
        assoc = _associations.pop((region, assoc_id))
        return {"AssociationId": assoc_id, "Lifecycle": "DELETING", "DeleteDataInFileSystem": assoc is None}
