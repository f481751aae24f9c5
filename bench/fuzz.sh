#!/usr/bin/env bash
# The long fuzz run of issue "every real CNN topology": hundreds of random networks.
# Usage: bash bench/fuzz.sh [EXAMPLES] [PYTEST ARGS...]   (default 500 per property)
# Hypothesis's statistics (cases passing/failing per property) are printed at the end;
# bench/torch_corpus.py --fuzz-log reads them from a saved log.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-500}"
shift || true
ONNXPRUNE_FUZZ_EXAMPLES="$examples" python -m pytest -q tests/test_fuzz.py -p no:cacheprovider --hypothesis-show-statistics "$@"
