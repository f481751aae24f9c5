#!/usr/bin/env bash
# The long fuzz run of issue "every real CNN topology": hundreds of random networks.
# Usage: bash bench/fuzz.sh [EXAMPLES]   (default 500 per property)
set -euo pipefail
cd "$(dirname "$0")/.."
ONNXPRUNE_FUZZ_EXAMPLES="${1:-500}" python -m pytest -q tests/test_fuzz.py -p no:cacheprovider
