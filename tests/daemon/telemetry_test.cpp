// filled in shortly (telemetry engineer)
#include <doctest/doctest.h>
