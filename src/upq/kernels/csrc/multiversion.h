// UPQ_MULTIVERSION: compile a function for AVX-512, AVX2 and baseline x86-64 (GCC function
// multiversioning; the loader picks the best the CPU has). The extension's own flags target the
// baseline, where plain loops would vectorize only 4 wide.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UPQ_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UPQ_MULTIVERSION
#endif
