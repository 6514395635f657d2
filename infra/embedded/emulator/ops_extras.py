"""What `moefleet preflight` asks that moto 5.2 cannot answer: EC2 Service Quotas and capacity reservations.

- Service Quotas: moto serves only the `vpc` service's defaults. Here, EC2's vCPU quotas for on-demand
  instance families (P, G/VT, standard) are served per region with `GetServiceQuota`, `ListServiceQuotas`,
  and `RequestServiceQuotaIncrease`, which the emulator approves at once (AWS approves small increases
  automatically too). The starting value is 64 vCPUs for every code: a stand-in, not AWS's default for a
  new account (often 0 for P instances); tests raise it with the real API.
- Capacity reservations (`CreateCapacityReservation`, `DescribeCapacityReservations`,
  `CancelCapacityReservation`): EC2 query API, XML out, `active` at once, `cancelled` after cancel.
- Capacity Blocks for ML (`DescribeCapacityBlockOfferings`, `PurchaseCapacityBlock`): an offering is made
  for whatever is asked (first AZ of the region, the requested start or now, the requested whole days);
  the purchase is a reservation of type `capacity-block` with `startDate`/`endDate`, whose state follows
  the clock (`scheduled` before the start, `active` inside the window, `expired` after). Unlike AWS, a start
  in the past is accepted, so tests can buy an already active or already expired block.

Everything else passes through to moto untouched (the request body is restored).

server.py routes every request through `dispatch` first.
"""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from infra.embedded.emulator.errors import ApiError

ACCOUNT_ID = "123456789012"  # moto's default account
QUOTA_TARGET_PREFIX = "ServiceQuotasV20190624."
EC2_ACTIONS = {
    "CreateCapacityReservation",
    "DescribeCapacityReservations",
    "CancelCapacityReservation",
    "DescribeCapacityBlockOfferings",
    "PurchaseCapacityBlock",
}
_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

#: EC2 on-demand vCPU quotas: code → name. Values are per region.
EC2_QUOTAS = {
    "L-417A185B": "Running On-Demand P instances",
    "L-DB2E81BA": "Running On-Demand G and VT instances",
    "L-1216C47A": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
}
START_VALUE = 64.0

_lock = threading.Lock()
_quota_values: dict[tuple[str, str], float] = {}
_reservations: dict[str, dict[str, Any]] = {}
_offerings: dict[str, dict[str, Any]] = {}


def reset() -> None:
    with _lock:
        _quota_values.clear()
        _reservations.clear()
        _offerings.clear()


def dispatch(
    environ: dict[str, Any], start_response: Callable, service: str | None, region: str
) -> Iterable[bytes] | None:
    """Answer the request if it is ours; otherwise return None (and leave the body readable for moto)."""
    if service == "servicequotas":
        target = environ.get("HTTP_X_AMZ_TARGET", "").removeprefix(QUOTA_TARGET_PREFIX)
        raw = _read_body(environ)
        body = json.loads(raw) if raw else {}
        if body.get("ServiceCode") != "ec2":
            return None
        try:
            payload = _quotas(target, body, region)
        except ApiError as err:
            return _reply(start_response, "400 Bad Request", "application/x-amz-json-1.1",
                          json.dumps({"__type": err.code, "message": err.message}))  # fmt: skip
        if payload is None:
            return None
        return _reply(start_response, "200 OK", "application/x-amz-json-1.1", json.dumps(payload))
    if service == "ec2" and environ.get("REQUEST_METHOD") == "POST":
        raw = _read_body(environ)
        params = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        action = params.get("Action")
        if action not in EC2_ACTIONS:
            return None
        try:
            return _reply(start_response, "200 OK", "text/xml", _ec2(action, params, region))
        except ApiError as err:
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{escape(err.code)}</Code>'
                f"<Message>{escape(err.message)}</Message></Error></Errors><RequestID>{secrets.token_hex(8)}"
                "</RequestID></Response>"
            )
            return _reply(start_response, "400 Bad Request", "text/xml", xml)
    return None


def _read_body(environ: dict[str, Any]) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(raw)
    return raw


def _reply(start_response: Callable, status: str, content_type: str, text: str) -> Iterable[bytes]:
    data = text.encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


# ---- Service Quotas ---------------------------------------------------------------------------------


def _quota(code: str, region: str) -> dict[str, Any]:
    return {
        "ServiceCode": "ec2",
        "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
        "QuotaArn": f"arn:aws:servicequotas:{region}:{ACCOUNT_ID}:ec2/{code}",
        "QuotaCode": code,
        "QuotaName": EC2_QUOTAS[code],
        "Value": _quota_values.get((region, code), START_VALUE),
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
    }


def _quotas(action: str, body: dict[str, Any], region: str) -> dict[str, Any] | None:
    with _lock:
        if action == "ListServiceQuotas":
            return {"Quotas": [_quota(code, region) for code in EC2_QUOTAS]}
        if action not in ("GetServiceQuota", "RequestServiceQuotaIncrease"):
            return None
        code = body.get("QuotaCode", "")
        if code not in EC2_QUOTAS:
            raise ApiError("NoSuchResourceException", f"The request failed because the quota {code} does not exist.")
        if action == "GetServiceQuota":
            return {"Quota": _quota(code, region)}
        desired = float(body.get("DesiredValue", 0))
        current = _quota_values.get((region, code), START_VALUE)
        if desired <= current:
            raise ApiError(
                "IllegalArgumentException", f"DesiredValue {desired} must be greater than the current value {current}."
            )
        _quota_values[(region, code)] = desired
        quota = _quota(code, region)
        now = time.time()
        return {
            "RequestedQuota": {
                "Id": secrets.token_hex(16),
                "ServiceCode": "ec2",
                "ServiceName": quota["ServiceName"],
                "QuotaCode": code,
                "QuotaName": quota["QuotaName"],
                "DesiredValue": desired,
                "Status": "APPROVED",
                "Created": now,
                "LastUpdated": now,
                "Requester": f"arn:aws:iam::{ACCOUNT_ID}:root",
                "QuotaArn": quota["QuotaArn"],
                "GlobalQuota": False,
                "Unit": "None",
            }
        }


# ---- capacity reservations --------------------------------------------------------------------------


def _ec2(action: str, params: dict[str, str], region: str) -> str:
    with _lock:
        if action == "CreateCapacityReservation":
            item = _create_reservation(params, region)
            return _response(action, f"<capacityReservation>{_item_xml(item)}</capacityReservation>")
        if action == "DescribeCapacityBlockOfferings":
            offer = _offer_block(params, region)
            return _response(
                action, f"<capacityBlockOfferingSet><item>{_offer_xml(offer)}</item></capacityBlockOfferingSet>"
            )
        if action == "PurchaseCapacityBlock":
            item = _purchase_block(params, region)
            return _response(action, f"<capacityReservation>{_item_xml(item)}</capacityReservation>")
        if action == "CancelCapacityReservation":
            item = _find(params["CapacityReservationId"], region)
            item["state"] = "cancelled"
            item["availableInstanceCount"] = 0
            return _response(action, "<return>true</return>")
        wanted = [v for k, v in sorted(params.items()) if k.startswith("CapacityReservationId.")]
        items = [_find(rid, region) for rid in wanted] if wanted else [
            r for r in _reservations.values() if r["region"] == region
        ]  # fmt: skip
        body = "".join(f"<item>{_item_xml(r)}</item>" for r in items)
        return _response(action, f"<capacityReservationSet>{body}</capacityReservationSet>")


def _create_reservation(params: dict[str, str], region: str) -> dict[str, Any]:
    zone = params["AvailabilityZone"]
    if not zone.startswith(region):
        raise ApiError("InvalidParameterValue", f"Availability zone {zone} is not in region {region}")
    count = int(params["InstanceCount"])
    if count < 1:
        raise ApiError("InvalidParameterValue", "InstanceCount must be at least 1")
    rid = "cr-" + secrets.token_hex(9)[:17]
    tags = {}
    i = 1
    while f"TagSpecifications.1.Tag.{i}.Key" in params:
        tags[params[f"TagSpecifications.1.Tag.{i}.Key"]] = params.get(f"TagSpecifications.1.Tag.{i}.Value", "")
        i += 1
    item = {
        "id": rid,
        "region": region,
        "instanceType": params["InstanceType"],
        "instancePlatform": params.get("InstancePlatform", "Linux/UNIX"),
        "availabilityZone": zone,
        "totalInstanceCount": count,
        "availableInstanceCount": count,
        "state": "active",
        "instanceMatchCriteria": params.get("InstanceMatchCriteria", "open"),
        "tenancy": params.get("Tenancy", "default"),
        "endDateType": params.get("EndDateType", "unlimited"),
        "tags": tags,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    }
    _reservations[rid] = item
    return item


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _offer_block(params: dict[str, str], region: str) -> dict[str, Any]:
    hours = int(params.get("CapacityDurationHours", "24"))
    if hours < 24 or hours % 24:
        raise ApiError("InvalidParameterValue", "CapacityDurationHours must be a multiple of 24")
    count = int(params.get("InstanceCount", "1"))
    raw_start = params.get("StartDateRange")
    start = datetime.fromisoformat(raw_start.replace("Z", "+00:00")) if raw_start else datetime.now(UTC)
    offer = {
        "id": "cb-" + secrets.token_hex(9)[:17],
        "instanceType": params["InstanceType"],
        "availabilityZone": f"{region}a",
        "instanceCount": count,
        "start": start.astimezone(UTC).replace(microsecond=0),
        "hours": hours,
        "region": region,
    }
    _offerings[offer["id"]] = offer
    return offer


def _offer_xml(offer: dict[str, Any]) -> str:
    end = offer["start"] + timedelta(hours=offer["hours"])
    return (
        f"<capacityBlockOfferingId>{offer['id']}</capacityBlockOfferingId>"
        f"<instanceType>{escape(offer['instanceType'])}</instanceType>"
        f"<availabilityZone>{offer['availabilityZone']}</availabilityZone><instanceCount>{offer['instanceCount']}"
        f"</instanceCount><startDate>{_iso(offer['start'])}</startDate><endDate>{_iso(end)}</endDate>"
        f"<capacityBlockDurationHours>{offer['hours']}</capacityBlockDurationHours><upfrontFee>0.00</upfrontFee>"
        "<currencyCode>USD</currencyCode><tenancy>default</tenancy>"
    )


def _purchase_block(params: dict[str, str], region: str) -> dict[str, Any]:
    offer = _offerings.pop(params.get("CapacityBlockOfferingId", ""), None)
    if offer is None or offer["region"] != region:
        raise ApiError(
            "InvalidParameterValue", f"Capacity Block offering {params.get('CapacityBlockOfferingId')!r} is unknown"
        )
    item = _create_reservation(
        {
            "AvailabilityZone": offer["availabilityZone"],
            "InstanceCount": str(offer["instanceCount"]),
            "InstanceType": offer["instanceType"],
            "InstancePlatform": params.get("InstancePlatform", "Linux/UNIX"),
            "InstanceMatchCriteria": "targeted",
            "EndDateType": "limited",
        },
        region,
    )
    item["reservationType"] = "capacity-block"
    item["start"] = offer["start"]
    item["end"] = offer["start"] + timedelta(hours=offer["hours"])
    return item


def _state(item: dict[str, Any]) -> str:
    """A capacity block's state follows the clock unless it was cancelled."""
    if item.get("reservationType") != "capacity-block" or item["state"] == "cancelled":
        return item["state"]
    now = datetime.now(UTC)
    return "scheduled" if now < item["start"] else "active" if now < item["end"] else "expired"


def _find(rid: str, region: str) -> dict[str, Any]:
    item = _reservations.get(rid)
    if item is None or item["region"] != region:
        raise ApiError("InvalidCapacityReservationId.NotFound", f"The capacity reservation ID '{rid}' does not exist")
    return item


def _item_xml(item: dict[str, Any]) -> str:
    item = {**item, "state": _state(item), "reservationType": item.get("reservationType", "default")}
    tags = "".join(
        f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>" for k, v in sorted(item["tags"].items())
    )
    arn = f"arn:aws:ec2:{item['region']}:{ACCOUNT_ID}:capacity-reservation/{item['id']}"
    fields = "".join(
        f"<{key}>{escape(str(item[key]))}</{key}>"
        for key in (
            "instanceType", "instancePlatform", "availabilityZone", "totalInstanceCount", "availableInstanceCount",
            "state", "instanceMatchCriteria", "tenancy", "endDateType", "reservationType",
        )
    )  # fmt: skip
    if "start" in item:
        fields += f"<startDate>{_iso(item['start'])}</startDate><endDate>{_iso(item['end'])}</endDate>"
    return (
        f"<capacityReservationId>{item['id']}</capacityReservationId><ownerId>{ACCOUNT_ID}</ownerId>"
        f"<capacityReservationArn>{arn}</capacityReservationArn>{fields}<createDate>{item['created']}</createDate>"
        f"<tagSet>{tags}</tagSet>"
    )


def _response(action: str, inner: str) -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{_NS}">'
        f"<requestId>{secrets.token_hex(8)}</requestId>{inner}</{action}Response>"
    )
