/*
 * The OpenMP threads of the calling thread, for ops/cpu.py's `one_thread` and `release_threads`. The
 * library links the same OpenMP runtime as PyTorch's CPU build (libgomp, loaded by then), so these also
 * reach PyTorch's own parallel loops and oneDNN on this thread; other threads keep theirs.
 */

#include <omp.h>

/* Sets this thread's team size for later parallel regions; returns the one it had. */
int st_mamba_set_thread_count(int n_threads) {
    int previous = omp_get_max_threads();
    omp_set_num_threads(n_threads);
    return previous;
}

/*
 * Ends the worker threads that this thread's parallel regions left waiting (OpenMP 5.0's soft pause;
 * libgomp frees the calling thread's pool). The next parallel region on this thread starts new ones.
 * Returns 0 on success.
 */
int st_mamba_release_threads(void) {
    return omp_pause_resource_all(omp_pause_soft);
}
