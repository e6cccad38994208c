//! The guest images carried in the binary (built by `build.rs`).
include!(concat!(env!("OUT_DIR"), "/guest_images.rs"));

/// How messages name [`KERNEL`] and [`KERNEL_TRACED`] (`VmConfig::kernel_origin`).
pub const KERNEL_ORIGIN: &str = "<built-in kernel>";
pub const KERNEL_TRACED_ORIGIN: &str = "<built-in kernel, traced>";

/// The program run when no `--program` is given.
pub const DEFAULT_PROGRAM: &str = "hello";

/// The embedded program called `name`.
pub fn program(name: &str) -> Option<&'static [u8]> {
    PROGRAMS.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

impl crate::boot::ProgramImage {
    /// The built-in program called `name`.
    pub fn builtin(name: &str) -> Option<Self> {
        program(name).map(|image| Self { name: name.to_owned(), image: std::borrow::Cow::Borrowed(image) })
    }
}
