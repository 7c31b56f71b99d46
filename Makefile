# Thin wrapper around CMake presets. The real work is in CMakeLists.txt and deploy/dev/.
PRESET ?= dev
JOBS ?= $(shell nproc)
# `make run` and `make deb` build what users run: the optimized preset (RelWithDebInfo), in its own tree.
DIST_PRESET ?= release
DIST_DIR ?= build/$(DIST_PRESET)
# `make run SMTP_PORT=2535 HTTP_PORT=9735` when the defaults are taken (SINK_PORT: the local test sink).
SMTP_PORT ?= 2525
HTTP_PORT ?= 9725
SINK_PORT ?= 2526

.PHONY: deps deps-test build test asan-test tsan-test fuzz-smoke run bench fuzz deb clean

deps:
	deploy/dev/deps.sh build

deps-test:
	deploy/dev/deps.sh test

build: deps
	cmake --preset $(PRESET) >/dev/null
	cmake --build --preset $(PRESET) -j $(JOBS)

# Every test four ways: libFuzzer targets briefly (clang), units + integration under ASan+UBSan, the daemon's
# units and the thread-heavy integration tests under ThreadSanitizer, then the whole suite (units, integration,
# rules, dashboards, packaging, bench smoke) on the dev build. The last line is ctest's summary of the full suite.
test: deps-test fuzz-smoke asan-test tsan-test build
	ctest --preset $(PRESET) -j $(JOBS)

asan-test: deps-test
	cmake --preset asan >/dev/null
	cmake --build --preset asan -j $(JOBS)
	ctest --preset asan -j $(JOBS)

# ThreadSanitizer (the tsan preset, TSAN_OPTIONS and tests/tsan.supp with it): the daemon's units (label daemon)
# and the integration tests labelled threads (several event loops, HTTP scrapes, reloads and state saves at
# once). Not the whole suite: under TSan it is 5-15 times slower, and timing tests fail on its slowness.
tsan-test: deps-test
	cmake --preset tsan >/dev/null
	cmake --build --preset tsan -j $(JOBS) --target mailflowd daemon_tests
	ctest --preset tsan -j $(JOBS) -L "daemon|threads"

fuzz-smoke: deps-test
	cmake --preset fuzz -DMAILFLOW_FUZZ_SECONDS=10 >/dev/null
	cmake --build --preset fuzz -j $(JOBS) --target fuzz_targets
	ctest --preset fuzz -j $(JOBS)

# `make fuzz FUZZ_SECONDS=600`: each target for that long, new inputs kept in build/fuzz (see tests/fuzz/).
FUZZ_SECONDS ?= 60
fuzz: deps-test
	cmake --preset fuzz -DMAILFLOW_FUZZ_SECONDS=$(FUZZ_SECONDS) >/dev/null
	cmake --build --preset fuzz -j $(JOBS) --target fuzz_targets
	ctest --preset fuzz -j $(JOBS) --timeout $$(( $(FUZZ_SECONDS) + 120 ))

run: deps
	cmake --preset $(DIST_PRESET) -B $(DIST_DIR) >/dev/null
	cmake --build $(DIST_DIR) -j $(JOBS) --target mailflowd
	SMTP_PORT=$(SMTP_PORT) HTTP_PORT=$(HTTP_PORT) SINK_PORT=$(SINK_PORT) deploy/dev/run.sh $(DIST_DIR)/daemon/mailflowd

# Benchmarks: optimized build (release preset), then the harness (tests/bench/run_bench.py, docs/performance.md):
# mailflowd vs direct, nginx mail proxy and HAProxy on loopback; prints the table, writes bench/results.json.
# `make bench BENCH_ARGS="--rounds 5 --duration 3"` (run_bench.py --help lists the options).
BENCH_ARGS ?=
bench: deps-test
	cmake --preset release >/dev/null
	cmake --build --preset release -j $(JOBS) --target mailflowd mailflow_loadgen mailflow_proto_driver
	/usr/bin/python3 tests/bench/run_bench.py --build build/release --json bench/results.json $(BENCH_ARGS)

# The package: only what it ships is built (mailflowd, man pages; cmake/Packaging.cmake keeps cpack from
# building the whole tree), stripped by cpack; the build tree keeps the symbols.
deb: deps
	cmake --preset $(DIST_PRESET) -B $(DIST_DIR) >/dev/null
	cmake --build $(DIST_DIR) -j $(JOBS) --target mailflowd man
	rm -f $(DIST_DIR)/mailflowd_*.deb
	cd $(DIST_DIR) && cpack -G DEB
	@ls -1 $(DIST_DIR)/mailflowd_*.deb

clean:
	rm -rf build
