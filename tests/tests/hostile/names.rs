//! Names: the `squatter` program tries to take over the victim's name, to publish realms it
//! holds no right on, and to fill the name table, beside a victim (program 0 of the same
//! program) that publishes, looks up and checks its secret. Judged by what the victim reports,
//! and by the refusals the squatter saw of its own attempts.

use psyche_tests::Boot;

use super::{both_passed, saw};

#[test]
fn a_squatter_cannot_take_over_a_name_publish_others_realms_or_fill_the_table() {
    // Two programs: each has half of the 64 names.
    let run = Boot::new("uma").programs(&["squatter", "squatter"]).args(&["names", "32", "32"]).timeout(60.0).run();
    both_passed(&run, "names");
    // The squatter's own refusals.
    saw(&run, "squatter", "take over the victim's name: Err(NameTaken)");
    saw(&run, "squatter", "publish the victim's realm under a name of its own: Err(NoRight)");
    saw(&run, "squatter", "publish the victim's root realm: Err(NoRight)");
    saw(&run, "squatter", "publish a realm that does not exist: Err(NotFound)");
    saw(&run, "squatter", "its name went with it");
    saw(&run, "squatter", "the table is refused by its share: OverQuota");
    saw(&run, "squatter", "its share is 32 names: it holds 32");
    assert!(run.printed("squatter: published 31 more names, then OverQuota"), "{}", run.console.text());
    // The victim's view: its name stayed its own, its share was there beside the squatter's
    // whole share, and the squatter's names went when it ended.
    saw(&run, "victim", "the lookup says who published the squatter's name: program 1");
    saw(&run, "victim", "the vault's name still names the vault, published by this program");
    saw(&run, "victim", "31 names published beside the squatter's");
    saw(&run, "victim", "a name beyond the share: Err(OverQuota)");
    saw(&run, "victim", "the ended squatter's names are gone");
    saw(&run, "victim", "the secret is intact: 0x5ec2e7c0ffee0042");
}

#[test]
fn a_program_s_share_of_names_can_be_set_on_the_command_line() {
    // The squatter may hold 4 names; the victim keeps the default half of the table.
    let run = Boot::new("two-socket")
        .programs(&["squatter", "squatter"])
        .cmdline("quota=1:names=4")
        .args(&["names", "32", "4"])
        .timeout(60.0)
        .run();
    both_passed(&run, "names");
    saw(&run, "squatter", "its share is 4 names: it holds 4");
    saw(&run, "victim", "31 names published beside the squatter's");
}
