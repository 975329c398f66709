"""Tools around the compiler (not on its path): FakeTensor simulation at real scale
(:mod:`.simulate`), the benchmark (:mod:`.bench`), profiler peaks (:mod:`.measure`) and the tiny
architectures of the support table (:mod:`.architectures`)."""
