//! CPU runtime settings: the process-wide ones that the binaries (`mpcs`, the benchmarks) apply
//! first thing in `main`, before any thread exists (how freed memory is kept, which thread pool
//! runs the parallel CPU work), and the per-thread budget of CPU threads that the runner gives each
//! node ([`with_cpu_threads`]).

/// Both settings below; call it first thing in `main`.
pub fn configure() {
    keep_freed_memory();
    one_cpu_thread_pool();
}

/// mimalloc's `mi_option_purge_delay` (the C enum's value in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

/// Tells mimalloc (the binaries' global allocator) never to return freed memory to the OS.
/// Why: a training step frees and reallocates its activations (hundreds of MB for a ResNet-50 at
/// 224) every step; with the default 10 ms purge delay each step faults them in again, and the
/// kernel's page zeroing was half of a ResNet-50 inference profile. The resident size then stays at
/// the peak, which a training process reaches every step anyway. Call it first thing in `main`.
pub fn keep_freed_memory() {
    extern "C" {
        fn mi_option_set(option: i32, value: std::os::raw::c_long);
    }
    // Referencing the allocator type keeps the mimalloc library linked into every binary.
    let _allocator = mimalloc::MiMalloc;
    // SAFETY: mi_option_set only stores an integer option; any option/value pair is accepted.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Leaves parallel CPU work to rayon's pool alone, by giving candle's own "barrier pool" no worker
/// threads (`CANDLE_NUM_THREADS=1`, unless the user set it).
///
/// Why: candle 0.11 runs its element-wise ops (in training: mostly the gradient accumulation of
/// backprop) on a second pool whose idle workers spin for 25,000 iterations before they sleep,
/// while mpcs's kernels (convolution parts, BatchNorm, pooling, optimiser) and the GEMMs run on
/// rayon's pool. With both pools sized to the cores, the spinning workers took the cores from the
/// working ones: ResNet-18 64×64 training on 2 threads went from 84 to 115 images/s with this set
/// (notes/speed.md). It must run before candle's first element-wise op creates that pool.
pub fn one_cpu_thread_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at the start of `main`, before any other thread exists that could read the
        // environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

thread_local! {
    /// The CPU threads the work started on this thread may use (see [`with_cpu_threads`]).
    static CPU_THREADS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// How many threads the CPU kernels (convolutions, BatchNorm, optimisers, loaders) started from
/// this thread share their work between: the budget [`with_cpu_threads`] set for it, else the size
/// of rayon's pool (all cores, or `RAYON_NUM_THREADS`). Results never depend on it.
pub fn cpu_threads() -> usize {
    CPU_THREADS.with(|t| t.get()).unwrap_or_else(rayon::current_num_threads).max(1)
}

/// Runs `f` with a CPU-thread budget of `threads` for the kernels it starts on this thread (1: they
/// run on this thread alone, without handing work to rayon's pool). The runner gives each node its
/// share of the cores while several run at once: two nodes that each split every kernel between
/// both cores of a 2-core machine made four busy threads fight for two cores (notes/speed.md).
pub fn with_cpu_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    with_thread_local(&CPU_THREADS, Some(threads.max(1)), f)
}

/// Runs `f` with the thread-local `key` set to `value`, and its previous value back afterwards,
/// also when `f` panics: a per-thread setting scoped to a closure (`nn::no_grad` uses it too).
pub(crate) fn with_thread_local<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_thread_budget_applies_inside_and_is_restored_after_a_panic() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| {
            // Inside a pool's worker without a budget: the pool's size.
            assert_eq!(cpu_threads(), 3);
            with_cpu_threads(1, || {
                assert_eq!(cpu_threads(), 1);
                with_cpu_threads(2, || assert_eq!(cpu_threads(), 2));
                assert_eq!(cpu_threads(), 1, "a nested budget is restored");
            });
            assert_eq!(cpu_threads(), 3);
            let caught = std::panic::catch_unwind(|| with_cpu_threads(1, || panic!("inside the budget")));
            assert!(caught.is_err());
            assert_eq!(cpu_threads(), 3, "the budget outlived a panic");
        });
    }
}
