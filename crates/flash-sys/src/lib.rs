//! The only crate with unsafe code: CUDA (cudarc, loaded at run time), aligned and pinned memory, page-cache and file hints
