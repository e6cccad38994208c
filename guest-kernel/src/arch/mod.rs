//! Architecture code. Only x86_64 exists; the kernel core never reaches past this module.
pub mod x86_64;
