# Thin wrapper around CMake presets. The real work is in CMakeLists.txt and deploy/dev/.
PRESET ?= dev
JOBS ?= $(shell nproc)

.PHONY: deps deps-test build test run bench fuzz deb clean

deps:
	deploy/dev/deps.sh build

deps-test:
	deploy/dev/deps.sh test

build: deps
	cmake --preset $(PRESET) >/dev/null
	cmake --build --preset $(PRESET) -j $(JOBS)

test: deps-test build
	ctest --preset $(PRESET) -j $(JOBS)

run: build
	deploy/dev/run.sh build/$(PRESET)/daemon/mailflowd

# Benchmarks: optimized build (release preset), then the harness (tests/bench/run_bench.py, docs/performance.md):
# mailflowd vs direct, nginx mail proxy and HAProxy on loopback; prints the table, writes bench/results.json.
bench: deps-test
	cmake --preset release >/dev/null
	cmake --build --preset release -j $(JOBS) --target mailflowd mailflow_loadgen mailflow_proto_driver
	/usr/bin/python3 tests/bench/run_bench.py --json bench/results.json

deb: build
	cd build/$(PRESET) && cpack -G DEB
	@ls -1 build/$(PRESET)/mailflowd_*.deb

clean:
	rm -rf build
