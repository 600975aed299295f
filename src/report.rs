//! Progress reporting: the library calls a [`Reporter`]; the binary implements it with
//! progress bars on stderr, tests and library users with [`Silent`].

/// Receives progress from long operations. Implementations must be cheap.
pub trait Reporter: Sync {
    /// A named phase starts (e.g. "pass fold_batchnorm", "running the original in tract").
    fn phase(&self, name: &str);
    /// The current phase ended.
    fn phase_done(&self);
}

/// A reporter that shows nothing.
pub struct Silent;

impl Reporter for Silent {
    fn phase(&self, _name: &str) {}
    fn phase_done(&self) {}
}
