"""The embedded AWS's EKS creates honour their idempotency token, as EKS does: the AWS SDKs fill
``clientRequestToken`` and keep it across retries, so a create whose first answer was lost (a dropped
connection on a loaded box) is answered again instead of failing the apply with a 409."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

REGION = "us-east-1"


@pytest.fixture
def eks(emulator: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("eks", region_name=REGION, endpoint_url=emulator)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=emulator)
    vpc = ec2.create_vpc(CidrBlock="10.197.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.197.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    name = f"idem-{uuid.uuid4().hex[:8]}"
    client.create_cluster(
        name=name, roleArn="arn:aws:iam::123456789012:role/eks", resourcesVpcConfig={"subnetIds": subnets}
    )
    try:
        yield client, name
    finally:
        client.delete_cluster(name=name)
        for subnet in subnets:
            ec2.delete_subnet(SubnetId=subnet)
        ec2.delete_vpc(VpcId=vpc)


def test_a_retried_create_gets_its_first_answer_and_a_new_one_a_409(eks):
    client, cluster = eks
    ask = {
        "clusterName": cluster,
        "namespace": "kube-system",
        "serviceAccount": "cluster-autoscaler",
        "roleArn": "arn:aws:iam::123456789012:role/autoscaler",
    }
    token = str(uuid.uuid4())
    first = client.create_pod_identity_association(**ask, clientRequestToken=token)["association"]
    again = client.create_pod_identity_association(**ask, clientRequestToken=token)["association"]
    assert again["associationId"] == first["associationId"]
    listed = client.list_pod_identity_associations(clusterName=cluster)["associations"]
    assert [a["associationId"] for a in listed] == [first["associationId"]]
    with pytest.raises(ClientError) as exc:  # another request for the same service account
        client.create_pod_identity_association(**ask, clientRequestToken=str(uuid.uuid4()))
    assert exc.value.response["Error"]["Code"] == "ResourceInUseException"

    entry = {"clusterName": cluster, "principalArn": "arn:aws:iam::123456789012:role/ops"}
    made = client.create_access_entry(**entry, clientRequestToken=token)["accessEntry"]
    assert client.create_access_entry(**entry, clientRequestToken=token)["accessEntry"] == made
    with pytest.raises(ClientError):
        client.create_access_entry(**entry, clientRequestToken=str(uuid.uuid4()))
