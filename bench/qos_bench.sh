#!/bin/sh
# QoS benchmark (issue #14 item 7): achieved / limit at 10k IOPS and at 100 MiB/s, measured on
# the real tidemarkd (two cores, malloc bdev over iSCSI, 4 sessions) by tests/qos.rs.
# Usage: bench/qos_bench.sh   (from the repository root)
set -e
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_DEV_DEBUG=0
cargo test --test qos benchmark_goal -- --nocapture 2>&1 | grep '^QOS'
