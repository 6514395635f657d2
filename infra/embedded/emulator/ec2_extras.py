"""EC2 placement groups, which moto 5.2 does not implement (CreatePlacementGroup → NotImplementedError).

The large size puts its GPU nodes in a cluster placement group, so the emulator must create, describe
(with tags: the provider's default_tags round-trip through them) and delete one. EC2 query API: form
parameters in, XML out.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any
from xml.sax.saxutils import escape

from infra.embedded.emulator.errors import ApiError

ACCOUNT_ID = "123456789012"
ACTIONS = {"CreatePlacementGroup", "DescribePlacementGroups", "DeletePlacementGroup"}
_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

_lock = threading.Lock()
_groups: dict[tuple[str, str], dict[str, Any]] = {}


def reset() -> None:
    with _lock:
        _groups.clear()


def _indexed(params: dict[str, str], prefix: str) -> list[str]:
    return [v for k, v in sorted(params.items()) if k.startswith(prefix + ".")]


def _tags(params: dict[str, str]) -> dict[str, str]:
    tags = {}
    i = 1
    while f"TagSpecification.{i}.ResourceType" in params:
        j = 1
        while f"TagSpecification.{i}.Tag.{j}.Key" in params:
            tags[params[f"TagSpecification.{i}.Tag.{j}.Key"]] = params.get(f"TagSpecification.{i}.Tag.{j}.Value", "")
            j += 1
        i += 1
    return tags


def _item(group: dict[str, Any]) -> str:
    tags = "".join(
        f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in sorted(group["tags"].items())
    )
    return (
        f"<groupName>{escape(group['name'])}</groupName><groupId>{group['id']}</groupId>"
        f"<strategy>{group['strategy']}</strategy><state>available</state>"
        f"<groupArn>{group['arn']}</groupArn><tagSet>{tags}</tagSet>"
    )


def handle(action: str, params: dict[str, str], region: str) -> str:
    request_id = str(uuid.uuid4())
    with _lock:
        if action == "CreatePlacementGroup":
            name = params["GroupName"]
            if (region, name) in _groups:
                raise ApiError("InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists.")
            strategy = params.get("Strategy", "cluster")
            if strategy not in ("cluster", "spread", "partition"):
                raise ApiError("InvalidParameterValue", f"Strategy {strategy!r} is not valid")
            group_id = f"pg-{uuid.uuid4().hex[:17]}"
            group = {
                "name": name,
                "id": group_id,
                "strategy": strategy,
                "arn": f"arn:aws:ec2:{region}:{ACCOUNT_ID}:placement-group/{name}",
                "tags": _tags(params),
            }
            _groups[(region, name)] = group
            body = f"<return>true</return><placementGroup>{_item(group)}</placementGroup>"
        elif action == "DescribePlacementGroups":
            names = _indexed(params, "GroupName")
            ids = set(_indexed(params, "GroupId"))
            found = [g for (r, n), g in _groups.items() if r == region and (not names or n in names)]
            found = [g for g in found if not ids or g["id"] in ids]
            if (names or ids) and not found:
                raise ApiError(
                    "InvalidPlacementGroup.Unknown", f"The Placement Group {names or sorted(ids)} is unknown."
                )
            items = "".join(f"<item>{_item(g)}</item>" for g in found)
            body = f"<placementGroupSet>{items}</placementGroupSet>"
        else:  # DeletePlacementGroup
            name = params["GroupName"]
            if _groups.pop((region, name), None) is None:
                raise ApiError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
            body = "<return>true</return>"
    head = f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{_NS}">'
    return f"{head}<requestId>{request_id}</requestId>{body}</{action}Response>"


def error_xml(err: ApiError) -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{err.code}</Code>'
        f"<Message>{escape(err.message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
