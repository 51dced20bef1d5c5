//! Fuzzes everything a node parses from a peer or origin before trusting it:
//! `AutoUpdater.xml` and `AutoUpdater.xml.sig`. Parsing must never panic,
//! and a manifest that validates must survive a format-2 round trip.

#![no_main]

use lanup_protocol::sign::Signature;
use lanup_protocol::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Signature::from_text(text);
    }
    let Ok(manifest) = Manifest::parse(data) else {
        return;
    };
    if manifest.validate().is_err() {
        return;
    }
    let xml = manifest.to_xml().expect("a valid manifest serialises");
    let again = Manifest::parse(xml.as_bytes()).expect("written manifest parses");
    assert_eq!(again, manifest, "format 2 round trip changed the manifest");
});
