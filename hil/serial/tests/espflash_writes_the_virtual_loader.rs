//! espflash, as the HIL runner uses it, writes images into a ROM loader behind a pty: the
//! bytes land where they should, what was outside the images is untouched, and MD5
//! verification passes (espflash checks it after each image).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use otarig_serial::flasher::{flash, flash_with, Bars, Image, Target};
use otarig_serial::pty::Pty;
use otarig_serial::rom::{slip_encode, After, RomLoader, SlipFrames, VecFlash};

/// A loader behind a pty, over 4 MiB of flash filled with 0x5A; whether it was asked to run
/// the app, and whether the stub ran.
struct Board {
    pty: Pty,
    mem: Arc<Mutex<VecFlash>>,
    ran_app: Arc<Mutex<bool>>,
    stub: Arc<Mutex<bool>>,
}

fn board() -> Board {
    let pty = Pty::open().unwrap();
    let mem = Arc::new(Mutex::new(VecFlash(vec![0x5A; 4 << 20])));
    let ran_app = Arc::new(Mutex::new(false));
    let stub = Arc::new(Mutex::new(false));
    let (m, ran, st) = (mem.clone(), ran_app.clone(), stub.clone());
    let mut rx = pty.master().unwrap();
    let mut tx = pty.master().unwrap();
    std::thread::spawn(move || {
        let mut loader = RomLoader::new(4 << 20, [0x7C, 0xDF, 0xA1, 0x12, 0x34, 0x56]);
        let mut frames = SlipFrames::default();
        let mut buf = [0u8; 4096];
        while let Ok(n) = rx.read(&mut buf) {
            if n == 0 {
                break;
            }
            for f in frames.push(&buf[..n]) {
                let (replies, after) = loader.handle(&f, &mut *m.lock().unwrap());
                for r in replies {
                    tx.write_all(&slip_encode(&r)).unwrap();
                }
                *st.lock().unwrap() = loader.stub_running();
                if after == After::RunApp {
                    *ran.lock().unwrap() = true;
                }
            }
        }
    });
    Board {
        pty,
        mem,
        ran_app,
        stub,
    }
}

/// Waits until the board has handled every frame written before this call.
///
/// The board thread records what a frame did after it has written the frame's answer, so
/// espflash may return (it has its answer) before the flags say what its last `FLASH_END` did;
/// a CI run read `ran_app` too early. A SYNC written now is handled after every earlier frame
/// (one ordered byte stream, one thread), so its first answer is the barrier.
fn settle(pty: &Pty) {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pty.path())
        .expect("open the pty's slave");
    let mut sync = vec![0x00, 0x08, 36, 0, 0, 0, 0, 0, 0x07, 0x07, 0x12, 0x20];
    sync.extend([0x55; 32]);
    port.write_all(&slip_encode(&sync)).expect("write SYNC");
    let mut frames = SlipFrames::default();
    let mut buf = [0u8; 512];
    loop {
        let n = port.read(&mut buf).expect("read the SYNC answer");
        assert!(n > 0, "the board hung up before answering SYNC");
        if frames
            .push(&buf[..n])
            .iter()
            .any(|f| f.get(1) == Some(&0x08))
        {
            return;
        }
    }
}

#[test]
fn espflash_flashes_through_the_rom_loader_on_a_pty() {
    let Board {
        pty, mem, ran_app, ..
    } = board();

    let table: Vec<u8> = (0..3072u32).map(|i| (i % 251) as u8).collect();
    let app: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let images = [
        Image {
            name: "partition table".into(),
            addr: 0x8000,
            data: table.clone(),
        },
        Image {
            name: "otadata (erased)".into(),
            addr: 0xd000,
            data: vec![0xFF; 0x2000],
        },
        Image {
            name: "app".into(),
            addr: 0x10000,
            data: app.clone(),
        },
    ];
    let path = pty.path().to_str().unwrap().to_string();
    flash_with(&path, Target::Virtual, false, &images, &mut Bars::quiet())
        .expect("espflash writes the images");
    settle(&pty);

    let mem = mem.lock().unwrap();
    assert_eq!(&mem.0[0x8000..0x8000 + table.len()], &table[..]);
    assert!(
        mem.0[0xd000..0xf000].iter().all(|b| *b == 0xFF),
        "otadata erased"
    );
    assert_eq!(&mem.0[0x10000..0x10000 + app.len()], &app[..]);
    // The rest of a begun sector is erased (FLASH_BEGIN erases whole sectors); outside, untouched.
    assert!(mem.0[0x8000 + table.len()..0x9000]
        .iter()
        .all(|b| *b == 0xFF));
    assert_eq!(mem.0[0x7fff], 0x5A);
    assert_eq!(mem.0[0x9000], 0x5A);
    assert!(
        *ran_app.lock().unwrap(),
        "FLASH_END asked the board to run the app"
    );
}

/// espflash's default: it uploads its flasher stub (MEM_BEGIN/DATA/END), waits for `OHAI`,
/// then writes compressed (FLASH_DEFL_*) and checks each image with the stub's binary MD5.
#[test]
fn espflash_uploads_its_stub_and_writes_compressed() {
    let Board {
        pty,
        mem,
        ran_app,
        stub,
    } = board();
    // Compressible and not: a run of zeros, then noise.
    let mut app = vec![0u8; 100_000];
    app.extend((0..150_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let images = [Image {
        name: "app".into(),
        addr: 0x20000,
        data: app.clone(),
    }];
    let path = pty.path().to_str().unwrap().to_string();
    flash(&path, Target::Virtual, &images, &mut Bars::quiet())
        .expect("espflash writes via its stub");
    settle(&pty);
    assert!(*stub.lock().unwrap(), "the stub was uploaded and ran");
    let mem = mem.lock().unwrap();
    assert_eq!(&mem.0[0x20000..0x20000 + app.len()], &app[..]);
    assert_eq!(mem.0[0x1ffff], 0x5A, "nothing before the image was touched");
    assert!(
        !*ran_app.lock().unwrap(),
        "after a stub write the board waits in the loader until it is reset"
    );
}

#[test]
fn a_port_that_does_not_exist_says_so() {
    let err = flash(
        "/dev/does-not-exist",
        Target::Virtual,
        &[],
        &mut Bars::quiet(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot open serial port /dev/does-not-exist"),
        "{err}"
    );
}
