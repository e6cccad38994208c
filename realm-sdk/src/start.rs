//! The process entry point. The kernel enters at CPL3 with RSP at the top of the stack
//! (16-byte aligned) and RDI, RSI, RDX = argument block, its length, program index; `call`
//! gives the main function the stack alignment the SysV ABI expects.

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
_start:
    and rsp, -16
    call __realm_sdk_main
    ud2
    "#
);
