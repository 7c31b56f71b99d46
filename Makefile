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

deb: build
	cd build/$(PRESET) && cpack -G DEB
	@ls -1 build/$(PRESET)/mailflowd_*.deb

clean:
	rm -rf build
