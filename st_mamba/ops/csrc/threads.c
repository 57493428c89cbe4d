/*
 * The OpenMP team size of the calling thread, for ops/cpu.py's `one_thread`. The library links the
 * same OpenMP runtime as PyTorch's CPU build (libgomp, loaded by then), so the setting also reaches
 * PyTorch's own parallel loops and oneDNN on this thread; other threads keep theirs.
 */

#include <omp.h>

/* Sets this thread's team size for later parallel regions; returns the one it had. */
int st_mamba_set_thread_count(int n_threads) {
    int previous = omp_get_max_threads();
    omp_set_num_threads(n_threads);
    return previous;
}
