#!/usr/bin/env bash
# Idempotent project setup: .venv with the project installed, the pinned cdktf CLI in node_modules,
# and a project-local Terraform CLI config when the machine carries a provider mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PIP_CACHE_DIR="$root/.cache/pip" npm_config_cache="$root/.cache/npm"
PYTHON=${PYTHON:-python3}

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required on the PATH ($2)" >&2; exit 1; }; }
need "$PYTHON" "Python >= 3.11"
need node "Node.js >= 20 for the cdktf CLI"
need npm "npm, comes with Node.js"
need terraform "Terraform 1.11.x"

# Prometheus + promtool for the alert-rule tests and the local Prometheus: Debian's package, installed
# only when promtool is missing. RUNLEVEL=1 keeps invoke-rc.d from starting its service (we run the
# binary ourselves, on loopback ports of our choosing).
if ! command -v promtool >/dev/null 2>&1; then
  need apt-get "or install Prometheus 2.x yourself so that promtool and prometheus are on the PATH"
  echo "setup: installing Debian's prometheus package (promtool; its service is not started)"
  install_prometheus() {
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null
  }
  install_prometheus || { apt-get update -qq && install_prometheus; } || {
    echo "setup: 'apt-get install prometheus' failed; install Prometheus 2.x so promtool is on the PATH" >&2
    exit 1
  }
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU torch wheel on these machines must be installed before the project, or the resolver takes a
# CUDA build of several GB (see README). Elsewhere an installed torch is kept as it is.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e '.[infra,runtime,dev]'

# Static checkers pin many libraries of their own (checkov pins boto3 & co.); a separate tools venv keeps
# them from moving the project's dependencies.
if [ ! -x .venv-tools/bin/python ]; then
  "$PYTHON" -m venv .venv-tools
fi
.venv-tools/bin/python -m pip install --quiet -r scripts/tools-requirements.txt

echo "setup: installing the pinned cdktf CLI into node_modules"
if [ ! -x node_modules/.bin/cdktf ] || ! cmp -s package-lock.json node_modules/.package-lock.json.src 2>/dev/null; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.package-lock.json.src
fi

# Terraform: use the machine's filesystem mirror of the AWS provider when there is one; otherwise
# leave the normal registry behaviour alone (no config written, TF_CLI_CONFIG_FILE untouched).
mirror=${TF_PROVIDER_MIRROR:-}
if [ -z "$mirror" ]; then
  for candidate in /opt/tf-plugins /usr/share/terraform/plugins /usr/local/share/terraform/plugins; do
    if [ -d "$candidate/registry.terraform.io/hashicorp/aws" ]; then mirror=$candidate; break; fi
  done
fi
if [ -z "$mirror" ]; then
  found=$(find / -xdev -path '*/registry.terraform.io/hashicorp/aws/*' -name 'terraform-provider-aws_*' \
    -not -path "$root/*" 2>/dev/null | head -n 1 || true)
  [ -n "$found" ] && mirror=${found%%/registry.terraform.io/*}
fi
if [ -n "$mirror" ]; then
  cat > .tfrc <<TFRC
# Written by scripts/setup.sh: this machine carries a provider mirror at $mirror.
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.terraform.io/*/*"]
  }
  direct {
    exclude = ["registry.terraform.io/*/*"]
  }
}
TFRC
  echo "setup: terraform uses the provider mirror at $mirror (.tfrc)"
else
  rm -f .tfrc
  echo "setup: no provider mirror found; terraform uses the public registry"
fi
mkdir -p .cache/terraform/plugins .cache/jsii
echo "setup: done"
