fn main() {
    embuild::espidf::sysenv::output();
    println!("cargo:rerun-if-env-changed=OTARIG_FW_VERSION");
}
